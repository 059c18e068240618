"""cascade-clip: a fast, faithful Cascade-CLIP (ICML 2024) for zero-shot semantic segmentation."""
