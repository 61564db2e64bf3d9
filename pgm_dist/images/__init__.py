"""Images: the VQ tokenizer, Halton-order sampling with guidance, pictures and their evaluation."""
