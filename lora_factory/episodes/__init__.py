"""Anime episodes as a source: decoding, keyframes, figures and identity clusters."""
