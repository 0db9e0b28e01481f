"""The bundled demo: a small Switch-style MoE language model and the text it was trained on (apart from the format: nothing in the library imports it)."""
