"""What every command runs on, beside the method: the process start-up (`startup`), the distributed set-up
(`distributed`), work done ahead on a thread and side stream (`ahead`), durable writes and one writer per
folder (`durable`), argument types that refuse bad values at parse time (`arguments`) and the command-line
plumbing (`cli`: config files, logging, one line and an exit status per failure).

It sits on `dpal` and below `formats`, `kernels` and the two stages, and imports none of them.
"""
