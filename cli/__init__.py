"""The onnxzip command line (a thin layer over the onnxzip library)."""
