from __future__ import annotations

from django.contrib.contenttypes.fields import GenericForeignKey, GenericRelation
from django.db import models


class Author(models.Model):
    name = models.CharField(max_length=100)
    notes = GenericRelation("Note")

    def __str__(self) -> str:
        return self.name


class Book(models.Model):
    title = models.CharField(max_length=200)
    author = models.ForeignKey(Author, on_delete=models.CASCADE, related_name="books")
    pages = models.IntegerField(default=0)

    def __str__(self) -> str:
        return self.title


class Tag(models.Model):
    name = models.CharField(max_length=50, unique=True)
    books = models.ManyToManyField(Book, related_name="tags", blank=True)

    def __str__(self) -> str:
        return self.name


class Review(models.Model):
    """A nullable FK, so the reverse manager has aremove() and aclear()."""

    book = models.ForeignKey(
        Book, null=True, on_delete=models.SET_NULL, related_name="reviews"
    )
    stars = models.IntegerField(default=3)


class Note(models.Model):
    """A generic relation target: Author.notes is a generic related manager."""

    text = models.CharField(max_length=100)
    content_type = models.ForeignKey(
        "contenttypes.ContentType", on_delete=models.CASCADE
    )
    object_id = models.PositiveBigIntegerField(null=True)
    content_object = GenericForeignKey("content_type", "object_id")


class Tally(models.Model):
    """Rows that concurrent writers bump, for write-safety checks."""

    name = models.CharField(max_length=50, unique=True)
    value = models.IntegerField(default=0)
