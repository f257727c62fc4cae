"""Multi-bit networks: layers and switchable / shared norms, the models by name, the module swap that
makes any PyTorch model multi-bit, and the stored model size."""
