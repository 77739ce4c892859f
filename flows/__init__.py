"""Prefect flows: thin wiring of compress's stages. All logic lives in compress/."""
