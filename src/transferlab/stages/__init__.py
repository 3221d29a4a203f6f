"""The pipeline stages, one module each: download -> split -> train -> evaluate (see dvc.yaml)."""
