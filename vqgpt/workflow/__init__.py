"""The workflow floor, where the two stages meet: ``encode`` (images -> token shards), ``pipeline``
(tokenizer + prior, codes -> images), ``evaluation`` (tokenizer and prior metrics), ``classifier``
(the MNIST classifier behind class accuracy), ``chain`` (tokenizer -> encode -> prior -> pipeline as
one function), ``sample_many`` (many samples, one file each, on many processes, resumable) and ``importers`` (other projects' checkpoints -> vqgpt exports)."""
