"""Policies, their training in imagination (PPO on the dream env), and their evaluation in the real simulator."""
