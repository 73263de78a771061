"""writesae: sparse autoencoders for matrix-valued sites of Gated DeltaNet models (arrives with issue 5)."""
