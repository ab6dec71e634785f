"""Torch-free serving of exported DINO models (FastAPI + onnxruntime + FAISS)."""
