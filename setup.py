from setuptools import find_packages, setup

setup(
    name="eql_d2",
    version="0.1.0",
    description="Equalization losses (EQL, EQLv2, EFL, EQFL) and long-tailed detectors for detectron2",
    packages=find_packages(include=["eql_d2", "eql_d2.*"]),
    python_requires=">=3.9",
    # Ranges for users elsewhere; requirements/constraints.txt holds the tested pins.
    install_requires=[
        "torch>=2.1",
        "torchvision>=0.16",
        "numpy>=1.24",
        "fvcore",
        "iopath",
        "lvis>=0.5.3",
        "pycocotools>=2.0.2",
        # LVIS evaluation backend "fast" (TEST.EVAL.BACKEND); "lvis" needs only lvis
        "faster-coco-eval>=1.6",
        "matplotlib",
        "ensemble-boxes>=1.0.9",
        # streaming parse of LVIS-format JSONs into their compact form (eql_d2.data.compact)
        "ijson>=3.2",
    ],
    # tools/slurm_train.py: Slurm jobs that requeue themselves on time-out or pre-emption
    # "test": tests/modeling/test_paa.py checks PAA's Gaussian mixture against scikit-learn's
    extras_require={"slurm": ["submitit>=1.5"], "test": ["scikit-learn>=1.2"]},
)
