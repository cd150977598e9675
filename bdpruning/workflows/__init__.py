"""The stages, one file each: run a stage and write its output directory atomically.

``convert`` (Keras .h5 -> a verified model directory), ``prune`` (the lab's sweep and its
repaired models), ``defend`` (any pruning criterion), ``compact`` (physical channel removal),
``finetune`` (fine-pruning's saved run), ``evaluate`` (accuracy/ASR, and GoodNet's rows and plot). The
``bdprune`` commands parse arguments and print; these modules do the work. Nothing is imported
here, so importing one stage does not import the others (the convert stage needs TensorFlow).
"""
