"""Measurements of the world model against its references: fidelity, action faithfulness, speed."""
