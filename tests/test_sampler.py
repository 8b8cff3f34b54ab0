import torch

from dfml_bench.data import load_dataset
from dfml_bench.data.sampler import EpisodeSampler


def _sampler(dataset_name: str, seed: int, shots: int = 2) -> EpisodeSampler:
    split = load_dataset(dataset_name).split("test")
    return EpisodeSampler(split, ways=5, shots=shots, queries=4, num_episodes=20, seed=seed)


def test_episode_shapes_and_labels(toy_dataset_name: str) -> None:
    for episode in _sampler(toy_dataset_name, 0):
        assert episode.support_images.shape == (10, 3, 32, 32)
        assert episode.query_images.shape == (20, 3, 32, 32)
        assert sorted(set(episode.support_labels.tolist())) == [0, 1, 2, 3, 4]
        assert torch.equal(torch.bincount(episode.query_labels), torch.full((5,), 4))
        assert len(set(episode.class_ids)) == 5


def test_support_and_query_are_disjoint(toy_dataset_name: str) -> None:
    sampler = _sampler(toy_dataset_name, 3)
    by_class = sampler._by_class
    for index in range(len(sampler)):
        generator_episode = sampler.episode(index)
        support = {bytes(img.numpy()) for img in generator_episode.support_images}
        query = {bytes(img.numpy()) for img in generator_episode.query_images}
        assert not support & query
    assert sum(len(indices) for indices in by_class) == len(sampler.split.labels)


def test_seeded_reproducibility_and_order_independence(toy_dataset_name: str) -> None:
    first, second = list(_sampler(toy_dataset_name, 7)), list(_sampler(toy_dataset_name, 7))
    other = list(_sampler(toy_dataset_name, 8))
    for a, b in zip(first, second):
        assert torch.equal(a.support_images, b.support_images) and a.class_ids == b.class_ids
    assert any(a.class_ids != c.class_ids for a, c in zip(first, other))
    assert torch.equal(
        _sampler(toy_dataset_name, 7).episode(13).query_images, first[13].query_images
    )
