"""The generator that fills each client's missing classes: a class-conditional diffusion model
(or the GAN baseline), its checkpoints, training on the server's public data, guided sampling,
and a gRPC service with a content-addressed cache."""
