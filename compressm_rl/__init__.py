"""compressm-rl: recurrent PPO for SSM policies, in-training balanced truncation, CLI."""

__version__ = "0.1.0"
