"""The built-in demo model's world: toy clips with captions (toy_world.py), a probe that reads a generated video
back (probe.py), and the training that makes a small Wan VAE + DiT draw them (train.py)."""
