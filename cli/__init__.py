"""Command-line interface of onnxbits (installed as the subpackage ``onnxbits.cli``).

Importing it sets ``OMP_WAIT_POLICY=PASSIVE`` (unless the user set the variable) before anything
loads torch: see :func:`onnxbits.train.device.prefer_passive_omp_wait`.
"""

from onnxbits.train.device import prefer_passive_omp_wait

prefer_passive_omp_wait()
