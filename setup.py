"""Package discovery for setuptools; the project's metadata lives in pyproject.toml.

Every package under bdpruning/ is found automatically, so a new folder is never left out of a
wheel. The repository's folders convert/ and lightning_modules/ (and any package inside them)
install under the bdpruning namespace, as bdpruning.convert and bdpruning.lightning_modules, so
an environment never gets a top-level package named ``convert``.
"""

from setuptools import find_packages, setup

NESTED = {"convert": "bdpruning.convert", "lightning_modules": "bdpruning.lightning_modules"}

packages = find_packages(include=["bdpruning", "bdpruning.*"])
package_dir = {"bdpruning": "bdpruning"}
for folder, name in NESTED.items():
    packages += [name + found[len(folder):] for found in find_packages(include=[folder, f"{folder}.*"])]
    package_dir[name] = folder

setup(packages=packages, package_dir=package_dir)
