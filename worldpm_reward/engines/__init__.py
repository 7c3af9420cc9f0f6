"""Engines: what runs a reward model's forward pass.

Everything else (checkpoint checks, the family's input format, truncation, per-sample
errors, shaping and every protocol) is the same whichever engine runs it.

  * ``transformers`` (:class:`worldpm_reward.scoring.RewardModel`, the default): the model in
    this process, token-budgeted length-sorted batches, shared-prefix scoring of GRPO groups.
  * ``vllm`` (:mod:`.vllm_engine`): vLLM's pooling runner (tensor parallel, continuous
    batching, its kernels), in this process when vLLM imports here, else in its own
    virtualenv behind ``vllm serve`` (vLLM pins its own torch and transformers).
  * ``fsdp`` (:mod:`.sharded`): ONE model sharded over the ranks of a torch.distributed job
    (FSDP2), each rank scoring its own samples in collective forward calls.
"""
