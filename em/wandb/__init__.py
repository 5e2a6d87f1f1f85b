"""em's W&B tools above training: a job's final evaluation in its run (:mod:`em.wandb.job`,
:mod:`em.wandb.eval_log`), uploading a finished run dir (:mod:`em.wandb.upload`), the dashboard definition
(:mod:`em.wandb.dashboard`) and the ``em wandb`` command (:mod:`em.wandb.cli`).

(Training's own W&B logger is :mod:`em.training.wandb_logging`; an offline run's files are read by
:mod:`em.utils.wandb_offline`.)
"""
