"""The presets (`tiny`, `small`, `base`) as YAML files. A package only so that they install with the project: a
non-editable install finds them here, beside the code, from any working directory (`worldmodel.config`)."""
