# train_gpt.py with Python stack dumps of every thread on SIGUSR1 (to see where a stuck run waits)
import faulthandler
import runpy
import signal
import sys
faulthandler.register(signal.SIGUSR1, all_threads=True)
sys.argv = ["train_gpt.py"]
runpy.run_path("train_gpt.py", run_name="__main__")
