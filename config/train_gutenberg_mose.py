# MoSE where a wider expert pays: Project Gutenberg by character, a small model read for long. At this size and
# budget a plain MoE with experts of 128 hidden units beats ones of 64 and 32 trained on the same FLOPs (RESULTS.md,
# "where a wider expert pays"), so the capacity MoSE slims is worth something, and its narrow widths can be held to
# models trained for their size.
# python prepare_data.py gutenberg_char --input=PATH/gutenberg && python train.py config/train_gutenberg_mose.py
#
# The data (prepared from the shared copy, 468 books by 91 authors): train.bin 91,453,766 characters by 86
# authors, val.bin 5,274,595 characters by 5 others. holdout_authors below keeps the last 3 authors of train.bin
# out of training (prepare_data.py lists them in meta.pkl; on the shared copy Zola, Hardy, Homer: 3,416,395
# characters), so choosing a recipe on --split=holdout is choosing it on writers the model never read, as val is;
# on the shared copy 88,037,371 characters are left to train on.
#
# The shape: the Shakespeare model made small (n_embd 32, 2 heads) with an MoE layer in every block, so the experts
# are 62 % of the forward FLOPs and the width dial has something to save. Forward FLOPs per token
# (GPT.flops_breakdown, vocabulary 211): 212.4k for the MoE at full width, 163.3k for a mean step of the shipped
# recipe (widths 1 / 0.75 / 0.5 / 0.25 a quarter each: a mean 0.625 of the expert FLOPs), and
# 179.6k / 146.9k / 114.1k for the MoEs of 96 / 64 / 32 hidden units. A step is 32 x 128 = 4,096 characters and
# costs 3x its forward, so 3.0e13 FLOPs buy:
#   MoSE                    14,954 steps, 61.3M characters
#   plain MoE               11,494 steps, 47.1M characters (0.287M parameters, 0.090M active per token)
#   MoEs of 96 / 64 / 32    13,590 / 16,622 / 21,395 steps
# at most 88M characters, so no run reads a character twice on average (train.py draws random windows).
# The learning rate, 4e-3, is every size's best on the held-out authors (scanned 2e-3 to 1.6e-2 at 1.5e13).
# Time, on this project's 2-core AMD EPYC VM, one thread a run, two runs at a time: the MoE 19-21 minutes,
# MoSE 24-25 (evaluations included; the earlier p_full law 25-27, 34 before exact shares, RESULTS.md "memory").
exec(open('config/train_shakespeare_mose.py').read())
out_dir = 'out-gutenberg-mose'
dataset = 'gutenberg_char'
holdout_authors = 3             # the last 3 authors of train.bin, whatever copy it was prepared from
n_head = 2
n_embd = 32
moe_stride = 1                  # an MoE layer in every block
expert_hidden = 128             # 4 * n_embd per expert, two active: 8 * n_embd of expert FFN per token
learning_rate = 4e-3
min_lr = 4e-4
eval_interval = 2000
max_train_flops = 3e13
