"""The composition root: the `worldmodel` command (`pipeline.cli`) and the whole run it drives (`pipeline.run`).
Nothing below imports it: `worldmodel` <- `envs` <- `agents` <- `bench` <- `pipeline` (the layers contract in
pyproject.toml, checked by `make test`)."""
