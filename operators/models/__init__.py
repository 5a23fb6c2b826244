"""Models: image/text backbones, grounding backends, weight import, the pseudo-labelling operator."""
