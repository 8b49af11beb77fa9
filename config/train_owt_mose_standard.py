# MoSE "GPT2-Standard" on OpenWebText: 12 layers / 12 heads / 768 wide, 8 experts, top-2, MoE every other
# block (321.8M parameters as train.py counts them, 322.6M with the position embeddings). Same recipe as
# config/train_owt_mose_small.py; ~9B tokens.
exec(open('config/train_owt_mose_small.py').read())
out_dir = 'out-owt-mose-standard'
wandb_run_name = 'mose-standard'
n_layer = 12
n_head = 12
n_embd = 768
expert_hidden = 3072
max_iters = 18000
lr_decay_iters = 18000
