"""The building blocks of the models: tensor-parallel linear layers, embedding and LM head,
RMSNorm, rotary embeddings, activations and paged attention, each calling pagoda.kernels."""
