# MoSE on character-level Tiny Shakespeare: the main job, sized for a CPU (15.7 minutes, 2,129 steps, on one thread
# of this project's 2-core AMD EPYC VM shared with other runs).
# python prepare_data.py shakespeare_char && python train.py config/train_shakespeare_mose.py
out_dir = 'out-shakespeare-mose'
dataset = 'shakespeare_char'
eval_interval = 250
eval_iters = 20
log_interval = 50
always_save_checkpoint = False   # keep the best full-width val loss

batch_size = 32
block_size = 128                 # characters of context

# a baby GPT: 4 layers, 2 of them MoE (blocks 0 and 2) with 8 experts, 2 active per token
n_layer = 4
n_head = 4
n_embd = 128
dropout = 0.0
n_exp = 8
k_exp = 2
moe_stride = 2
expert_hidden = 256              # 2 * n_embd: two active experts cost what one dense 4 * n_embd MLP costs,
                                 # so config/train_shakespeare_dense.py is the equal-active-FLOPs baseline

# MoSE, trained in one pass per step (train.py's defaults, stated here): widths 1 / 0.75 / 0.5 / 0.25 drawn a
# quarter each (width_mix); half the sequences (p_sequence) run one width in all their pairs and MoE layers, the
# others draw a width per (token, expert) pair. Chosen on held-out training authors where width pays (RESULTS.md,
# "the recipe where width pays"); here it also closes the narrow widths' gap to models trained for their size.
# The run's length is a training compute, not a step count: 4.0e13 FLOPs is what 1,000 steps of the MoSE paper's
# recipe cost here (the full width plus one random width), and what 1,887 steps of the plain MoE cost; these
# cheaper single passes take 2,129 steps (GPT.flops_breakdown: 1.726M forward FLOPs per token at full width,
# 1.529M for a mean pass). The configs of the baselines inherit it, so every model of the comparison trains on
# the same compute. The earlier law (the full width with p_full 0.25, else uniform snapped): --width_mix=()
# --p_sequence=0. The paper's recipe:
#   --width_sampling=max_random --width_data=same --width_grid=0 --width_mix=()   ('fresh': a batch per width)
width_sampling = 'random_pair'
width_mix = (0.25, 0.25, 0.25, 0.25)
p_sequence = 0.5
width_grid = 0.25
w_min = 0.25
eval_widths = (1.0, 0.75, 0.5, 0.25)
eval_k = (1, 4)

learning_rate = 2e-3             # a small model on few tokens per step can take a large rate
max_train_flops = 4e13           # the training compute, forward + backward as train.py counts it
min_lr = 2e-4
warmup_iters = 50
beta2 = 0.99
