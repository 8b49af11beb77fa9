# MoSE "GPT2-Small" on OpenWebText (the MoSE paper's size names, not GPT-2's: this one is 6 layers / 6 heads /
# 384 wide, nanoMoE's model), 8 experts, top-2, an MoE layer in every other block (54.7M parameters with a 50304
# vocabulary, as train.py counts them: without the position embeddings, 55.1M with them). Meant for GPUs:
# python prepare_data.py openwebtext
# torchrun --standalone --nproc_per_node=4 train.py config/train_owt_mose_small.py
out_dir = 'out-owt-mose-small'
dataset = 'openwebtext'
wandb_log = False
wandb_project = 'nanomose-owt'
wandb_run_name = 'mose-small'

# 12 sequences x 1024 tokens x 40 accumulation steps = 491,520 tokens per step (nanoGPT's GPT-2 batch);
# 6,000 steps is about 3B tokens, the low end of the paper's "3-15B tokens"
batch_size = 12
block_size = 1024
gradient_accumulation_steps = 40
max_iters = 6000
lr_decay_iters = 6000
eval_interval = 500
eval_iters = 100
log_interval = 10

n_layer = 6
n_head = 6
n_embd = 384
dropout = 0.0
n_exp = 8
k_exp = 2
moe_stride = 2
expert_hidden = 1536             # 4 * n_embd: each expert is a GPT-2 MLP
width_multiple = 16              # the 0.05 grid below is the paper's, and 0.05 x 1536 = 76.8 hidden units fits
                                 # no multiple: 16 keeps each grid width within 6.4 units (0.42 %) of w x 1536,
                                 # every grid step a distinct size, and the matmuls tensor-core aligned (bf16 tiles
                                 # are 16 wide). 64 would move widths by up to 25.6 units (1.7 %); with 64 use
                                 # width_grid = 1/24, which it honours exactly
aux_loss_weight = 0.01
z_loss_weight = 0.001

# MoSE: the paper's recipe as a secondary source describes it, the full width plus one random width per step,
# both on the step's batch, widths on the 0.05 grid the paper uses at inference. On Shakespeare, at equal
# training compute, this recipe lost to the plain MoE and the single-pass 'random_pair' recipe did better
# (RESULTS.md, "does MoSE pay? the equal-compute runs"); at this scale neither has been run yet. To try it:
#   --width_sampling=random_pair --width_grid=0.25 --width_mix="(0.25,0.25,0.25,0.25)"   (train.py's law)
width_sampling = 'max_random'
width_data = 'same'
w_min = 0.25
width_grid = 0.05
width_mix = ()                   # the paper's law: uniform on [w_min, 1], snapped to the grid
eval_widths = (1.0, 0.75, 0.5, 0.25)
eval_k = (1, 4)

# nanoGPT's GPT-2 optimizer settings
learning_rate = 6e-4
min_lr = 6e-5
warmup_iters = 500
weight_decay = 0.1
beta2 = 0.95
compile = True
