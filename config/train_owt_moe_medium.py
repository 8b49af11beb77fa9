# The plain-MoE baseline for config/train_owt_mose_medium.py: same model and tokens, full width only.
exec(open('config/train_owt_mose_medium.py').read())
out_dir = 'out-owt-moe-medium'
wandb_run_name = 'moe-medium'
width_sampling = 'none'
