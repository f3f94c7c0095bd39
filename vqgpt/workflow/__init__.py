"""The workflow floor, where the two stages meet: ``encode`` (images -> token shards), ``pipeline``
(tokenizer + prior, codes -> images), ``evaluation`` (tokenizer and prior metrics), ``classifier``
(the MNIST classifier behind class accuracy), ``chain`` (tokenizer -> encode -> prior -> pipeline as
one function) and ``importers`` (other projects' checkpoints -> vqgpt exports)."""
