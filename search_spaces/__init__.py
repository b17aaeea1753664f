"""convtune search spaces: the sweep spec, its presets, and the Ray Tune driver."""
