"""Cost of the start-up check that every training image exists (DATALOADER.CHECK_IMAGE_FILES).

    python benchmarks/check_image_files.py --num-files 100000

Creates that many empty files in a temporary folder (LVIS v1 train has 100170 images),
then times eql_d2.data.train_loader.check_image_files over their file names, with one
file missing (the error path) and with all present.
"""

import argparse
import os
import tempfile
import time

from eql_d2.data.train_loader import check_image_files


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-files", type=int, default=100000)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as root:
        names = []
        for i in range(args.num_files):
            path = os.path.join(root, f"{i // 1000:03d}", f"{i:012d}.jpg")
            if i % 1000 == 0:
                os.makedirs(os.path.dirname(path))
            open(path, "wb").close()
            names.append(path)
        for label, files in (("all present", names),
                             ("one missing", names + [root + "/missing.jpg"])):
            times = []
            for _ in range(args.reps):
                t0 = time.perf_counter()
                try:
                    check_image_files(files, ["bench"])
                except FileNotFoundError:
                    pass
                times.append(time.perf_counter() - t0)
            print(f"{args.num_files} files, {label}: best {min(times):.3f} s, "
                  f"median {sorted(times)[len(times) // 2]:.3f} s over {args.reps} runs")


if __name__ == "__main__":
    main()
