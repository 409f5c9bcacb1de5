"""The contract between training, export and the runtime: torch-free, light, side-effect free.

- `errors`: the error types every package raises for problems a user can fix;
- `fileio`: atomic file writes;
- `preprocessing`: how an image becomes a model input;
- `priors`: latent priors, sampled with numpy from their description alone;
- `scores`: anomaly score definitions, fitted and evaluated on score parts;
- `metadata`: the metadata schema every exported graph carries, and its validation.

Training and export import these; nothing here imports ONNX Runtime, Pillow or torch.
"""
