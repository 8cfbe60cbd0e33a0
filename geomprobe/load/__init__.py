"""Getting a model to probe from outside a training loop: checkpoint formats (:mod:`.formats`), matching a
state dict's keys to a model's (:mod:`.keymatch`), planning and loading checkpoints (:mod:`.checkpoints`),
and ``module:function`` probe specs (:mod:`.spec`)."""
