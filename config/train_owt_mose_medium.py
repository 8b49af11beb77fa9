# MoSE "GPT2-Medium" on OpenWebText: 24 layers / 16 heads / 1024 wide, 8 experts, top-2, MoE every other
# block (1058.3M parameters as train.py counts them, 1059.3M with the position embeddings). Same recipe as
# config/train_owt_mose_small.py; ~15B tokens.
exec(open('config/train_owt_mose_small.py').read())
out_dir = 'out-owt-mose-medium'
wandb_run_name = 'mose-medium'
n_layer = 24
n_head = 16
n_embd = 1024
expert_hidden = 4096
learning_rate = 3e-4
min_lr = 3e-5
max_iters = 30000
lr_decay_iters = 30000
