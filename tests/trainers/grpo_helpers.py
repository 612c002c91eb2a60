"""GRPO settings shared by the BebopGRPOTrainer tests: tiny, fast runs on CPU."""

from bebop_trl import BebopGRPOConfig


def grpo_config(output_dir, config_class=BebopGRPOConfig, **overrides):
    """A GRPO config for a run of 2 steps of 4 completions of at most 10 tokens; `overrides` change any field."""
    settings = dict(
        output_dir=str(output_dir),
        use_cpu=True,
        bf16=False,
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=10,
        max_steps=2,
        learning_rate=1e-3,
        report_to="none",
        logging_steps=1,
        seed=0,
        save_strategy="no",
        disable_tqdm=True,
    )
    settings.update(overrides)
    return config_class(**settings)
