"""Class-conditional diffusion model that fills each client's missing classes: training on the
server's public data, guided sampling, and a gRPC service with a content-addressed cache."""
