"""Your own ``nn.Module`` as the backbone: any layer of it, pooled, into an SVC.

A small CNN is trained here for two epochs on 32 px digits, as a stand-in for
a network you already have. ``FeatureExtractor`` takes the module itself; give
``mean``/``std`` for your normalisation (the default is ImageNet's).
"""

import torch
from sklearn.model_selection import train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC
from torch import nn

from skt import FeatureExtractor, list_layers
from skt.datasets import load_digits_images

torch.manual_seed(0)


class SmallCNN(nn.Module):
    def __init__(self, classes=10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(32, classes)

    def forward(self, x):
        return self.classifier(self.pool(self.features(x)).flatten(1))


digits = load_digits_images(size=32)
X_train, X_test, y_train, y_test = train_test_split(
    digits.images, digits.target, test_size=0.3, stratify=digits.target, random_state=0)

model = SmallCNN()
optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
images = torch.tensor(X_train, dtype=torch.float32).div(255).sub(0.5).div(0.5)
images = images[:, None].expand(-1, 3, -1, -1)
labels = torch.tensor(y_train)
for _epoch in range(2):
    for batch in torch.randperm(len(images)).split(64):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(images[batch]), labels[batch]).backward()
        optimizer.step()

print("a few layer names:", list_layers(model)[-5:])
pipe = make_pipeline(
    FeatureExtractor(model, layers="features.5", pooling="avgmax", image_size=32,
                     mean=0.5, std=0.5),
    StandardScaler(),
    SVC(),
)
pipe.fit(X_train, y_train)
print(f"{pipe[0].n_features_out_} features from features.5; "
      f"test accuracy {pipe.score(X_test, y_test):.3f}")
