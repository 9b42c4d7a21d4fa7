"""A Flower app nobody in this project wrote, shaped like Flower's own ``quickstart-pytorch``.

Its own small CNN, its own data (synthetic CIFAR-sized images, a fixed partition per
client), its own training loop: ``torch.optim.SGD(lr=0.1, momentum=0.9)``, one local epoch in
``DataLoader`` batches of 32 (the last one ragged), cross-entropy. The clients report their
``partition-id`` in their metrics, as the ground-truth hook needs. Used by the auditor tests
and ``benchmarks/auditor_quickstart.py``; nothing here imports the auditor.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

BATCH_SIZE = 32
LR = 0.1
MOMENTUM = 0.9
EXAMPLES = 70  # per client: batches of 32, 32 and a ragged 6
SHAPE = (3, 32, 32)
MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)


class Net(nn.Module):
    """The quickstart's CNN (LeNet-style, as in Flower's quickstart-pytorch)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = x.flatten(1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


def load_partition(
    partition_id: int, examples: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The client's examples (default :data:`EXAMPLES`, read at call time so that a benchmark
    can change it), normalised as the model takes them: smooth random images."""
    examples = EXAMPLES if examples is None else examples
    gen = torch.Generator().manual_seed(1000 + partition_id)
    low = torch.rand(examples, 3, 8, 8, generator=gen)
    pixels = F.interpolate(low, size=SHAPE[1:], mode="bilinear", align_corners=False)
    images = (pixels - 0.5) / 0.5
    labels = torch.randint(0, 10, (examples,), generator=gen)
    return images, labels


def train_loader(partition_id: int, server_round: int) -> DataLoader:
    """The quickstart's shuffled loader (seeded per round so that tests can replay it)."""
    x, y = load_partition(partition_id)
    gen = torch.Generator().manual_seed(server_round * 100 + partition_id)
    return DataLoader(TensorDataset(x, y), batch_size=BATCH_SIZE, shuffle=True, generator=gen)


def visit_order(partition_id: int, server_round: int) -> torch.Tensor:
    """The order in which the client's loader visits its examples this round."""
    x, _ = load_partition(partition_id)
    gen = torch.Generator().manual_seed(server_round * 100 + partition_id)
    index = DataLoader(torch.arange(len(x)), batch_size=BATCH_SIZE, shuffle=True, generator=gen)
    return torch.cat(list(index))


app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    pid = int(context.node_config["partition-id"])
    model = Net()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    loader = train_loader(pid, int(msg.content["config"].get("server-round", 1)))
    total = 0.0
    for x, y in loader:
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        total += float(loss.detach())
    n = len(loader.dataset)
    metrics = {"train_loss": total / len(loader), "num-examples": n, "partition-id": pid}
    content = RecordDict(
        {"arrays": ArrayRecord(model.state_dict()), "metrics": MetricRecord(metrics)}
    )
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    pid = int(context.node_config["partition-id"])
    model = Net()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    model.eval()
    x, y = load_partition(pid)
    with torch.no_grad():
        logits = model(x)
    metrics = {
        "eval_loss": float(F.cross_entropy(logits, y)),
        "eval_acc": float((logits.argmax(1) == y).float().mean()),
        "num-examples": len(y),
    }
    return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
