"""Fixed, original English text: parity prompts in the tests, `lamina bench perplexity`'s
default text (nothing is downloaded)."""

PASSAGE = """\
The old stone bridge at the edge of the town had stood for nearly four hundred years.
Nobody remembered exactly who had built it, although the parish records mentioned a
mason named Tobias Wren who was paid in grain, salt and a small plot of land beside the
river. Every spring the water rose and pressed against the arches, and every spring the
townspeople gathered on the bank to watch whether the bridge would hold. It always did.
Children were told that the mortar had been mixed with honey and goat's milk, which made
it stronger than iron, and most of them believed it well into adulthood.

In the nineteenth century the railway arrived, and with it a new iron bridge a mile
downstream. Traffic moved away from the old crossing, the inn beside it closed, and the
road that led to it slowly turned to grass. Engineers from the capital came twice to
survey the structure. The first report recommended demolition; the second, written by a
young woman who had studied the arches for a whole summer, argued that the bridge was
a rare example of a technique that balanced each span against its neighbours so that no
single pier carried the full weight of the roadway. Her report was filed and forgotten.

A century later, when a flood destroyed the iron bridge in a single night, the old
stone crossing was the only way to reach the hospital on the other side of the river.
For three weeks ambulances, delivery vans and farmers with their cattle crossed the
narrow roadway one at a time, while volunteers directed traffic with lanterns. After the
waters fell, the town council found the forgotten report in a cabinet and read it aloud
at a public meeting. They voted to restore the bridge rather than replace it, and they
named the small park beside it after the engineer who had understood it first.

Today the bridge carries bicycles and pedestrians, and on summer evenings musicians play
beneath the central arch, where the echo is said to be the finest in the county. Visitors
often ask how a structure built without steel, concrete or modern calculations could
survive so many floods. The answer, according to the plaque in the park, is patience:
each stone was cut to fit the one beside it, and each arch was tested with sand before
it was trusted with people. The plaque ends with a sentence that schoolchildren still
copy into their notebooks: a good bridge is one that remembers every river it has met.

Questions for discussion. Why did the first survey recommend demolition? What did the
second engineer notice about the way the spans shared their load? How did the flood
change the town's opinion of the old crossing? Explain in your own words what the plaque
means when it says that a bridge remembers the rivers it has met, and describe another
object in your own town that has outlived the purpose it was built for.
"""
