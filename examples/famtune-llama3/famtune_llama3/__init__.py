"""famtune family plugin for Llama-3 Instruct, written only against famtune's public plugin API."""
