# The plain-MoE baseline for config/train_owt_mose_small.py: same model and tokens, full width only.
exec(open('config/train_owt_mose_small.py').read())
out_dir = 'out-owt-moe-small'
wandb_run_name = 'moe-small'
width_sampling = 'none'
