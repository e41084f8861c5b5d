"""The class names of the datasets whose classes are fixed: one list each, imported by the dataset
modules and by the report (which reads them without importing torch: this module imports nothing).

CIFAR-10 and Fashion-MNIST in their datasets' label order (torchvision's ``CIFAR10.classes`` /
``FashionMNIST.classes``, held equal by tests/test_report.py); MVTec AD's fifteen categories as the
dataset's download names them.
"""

DIGITS = tuple(str(d) for d in range(10))
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot")
MVTEC_CATEGORIES = ("bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut",
                    "pill", "screw", "tile", "toothbrush", "transistor", "wood", "zipper")
