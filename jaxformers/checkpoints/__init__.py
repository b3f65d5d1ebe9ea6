"""Checkpoints on disk: where they are (Hub ids, training-run directories), loading and saving models in any
form (native, HF, runs), their tokenizer files and parameter shapes."""
