import os
import socket
import time

import mctl

app = mctl.App("onslurm")


@app.function(cpu=3, max_containers=2)  # 3 of a node's 4 CPUs: two workers need two nodes
def where(x):
    time.sleep(0.3)
    return socket.gethostname()


@app.function(gpu="A100:2")
def gpus():
    return os.environ.get("CUDA_VISIBLE_DEVICES")


@app.function(gpu="A100:3")
def too_many_gpus():
    return "placed"


@app.function(max_containers=2, retries=mctl.Retries(max_retries=3, initial_delay=0.5))
def quick(x):
    time.sleep(0.002)
    return x * 2


@app.function(scaledown_window=1)
def brief(x):
    return socket.gethostname()


@app.function(schedule=mctl.Period(seconds=2))
def tick():
    # MCTL_HOME is the server's (and so its workers'), on a file system the nodes share
    with open(os.path.join(os.environ["MCTL_HOME"], "ticks"), "a") as fh:
        fh.write(socket.gethostname() + "\n")


@app.function(gpu="A100:2", max_containers=3, scaledown_window=2)
def gpu_work(x):
    time.sleep(3)
    return os.environ.get("CUDA_VISIBLE_DEVICES"), socket.gethostname()


@app.function(secrets=[mctl.Secret.from_dict({"GREETING": "hello from a secret"})])
def talk():
    print("printed on", socket.gethostname(), flush=True)
    return os.environ["GREETING"][::-1]  # reversed: the result must not carry the value itself


@app.function(max_containers=2)
def counted(x):
    # one line per execution, on the file system the nodes share: an input run twice shows
    with open(os.path.join(os.environ["MCTL_HOME"], "counted"), "a") as fh:
        fh.write(f"{x} {os.environ['MCTL_TASK_ID']} {time.time():.3f}\n")
    time.sleep(0.05)
    return x
