"""counterpoint: multimodal representation learning."""
