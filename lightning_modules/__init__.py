"""Lightning modules for evaluation, GoodNet and fine-tuning (installed as ``bdpruning.lightning_modules``)."""
