"""Gymnasium environments: the real simulators used as data sources, and the dream of a learned model.

`gymnasium.make("WorldModel/Dream-v0", checkpoint=RUN_DIR)` and
`gymnasium.make_vec("WorldModel/Dream-v0", num_envs=N, checkpoint=RUN_DIR)` build dreams of a trained run;
without `checkpoint`, of the CarRacing world model shipped with the package (`envs/shipped/carracing`,
docs/shipped_model.md).
"""

import gymnasium as gym

DREAM_ID = "WorldModel/Dream-v0"

if DREAM_ID not in gym.registry:
    gym.register(DREAM_ID, entry_point="envs.dream:DreamEnv", vector_entry_point="envs.dream:DreamVectorEnv")
