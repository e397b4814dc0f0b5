"""A repetitive workload, where prompt lookup (speculative decoding) helps: the model is
asked to rewrite a given document with its typos corrected, so most of its answer
copies the prompt.

`repetitive_messages(num)` is the whole API: `num` chat conversations (OpenAI message
lists), cycling through four passages of about 250 words, each with a dozen typos, and
four phrasings of the instruction. `lamina bench engine --workload repetitive` and the
peer benchmark both use it.
"""

from __future__ import annotations

INSTRUCTIONS = (
    "Rewrite the following text, correcting typos:",
    "Correct the spelling mistakes in this text and write it out in full:",
    "Fix the typos in the passage below. Reply with the corrected passage only.",
    "Proofread this text and return it with every typo fixed:",
)

PASSAGES = (
    "The lighthouse stood on a narow spit of rock at the mouth of the harbour. For more "
    "than a hundred years its keepers climbed the spiral stair every evening to light the "
    "lamp, and every morning they climbed it again to put it out. The stair had one "
    "hundred and twelve steps. The keepers knew each one by the sound it made underfoot, "
    "and they said that in a storm the tower itself sang a low note, like a finger drawn "
    "around the rim of a glass. In the winter of 1887 the relief boat could not reach the "
    "rock for six weeks. The keeper, a man named Tobias Hale, kept the light burning "
    "alone, rationing his oil and his bread, and writting in the log each night the state "
    "of the sea and the ships he had seen. When the boat finaly came, the crew found him "
    "thin but cheerful, and the log complete to the last day. His entries are short. "
    '"Wind north-east, strong. Sea very high. Two steamers passed at dusk, both well '
    'clear of the reef." The harbour master later wrote that no vessel was lost on that '
    "coast all winter, which he called a small miricle. Today the light is automatic and "
    "the keepers are gone, but the log books survive in the town museum, and visitors can "
    "still read Tobias Hale's neat handwritting, line after line, recording a winter that "
    "nobody else saw. The museum also keeps his lamp trimmer, his spectacles and a letter "
    "to his sister, in wich he says only that the view from the gallery was, as always, "
    "the finest in the county, and that she should not worry about him at all.",
    "Bread is one of the oldest prepared foods. Archaeologists have found charred crumbs "
    "at a site in Jordan that are more than fourteen thousand years old, older than "
    "farming itself. The first breads were probably flat, made from wild grains ground "
    "between stones, mixed with water and baked on hot ashes. Leavened bread came later, "
    "perhaps by acident, when a dough left standing was colonised by wild yeasts from "
    "the air. The yeasts eat the sugars in the flour and release carbon dioxide, which "
    "the gluten in the dough traps in countless small bubbles. Baking sets the structure "
    "and drives off the alcohol that the yeasts also produce. A good sourdough starter "
    "is a stable comunity of yeasts and lactic acid bacteria; the bacteria make the acids "
    "that give the bread its sour taste and help it keep for days. Some bakeries claim "
    "that thier starter is more than a century old, fed every day with fresh flour and "
    "water. Whether or not that is true, the microbes in it are certainly not the "
    "original ones: they have been replaced many thousands of times over. What survives "
    "is the balance between them, which is why a starter moved to a new kitchen often "
    "changes its caracter within a few weeks. Bakers who travel sometimes dry a little of "
    "their starter on a sheet of paper and carry it with them, so that they can wake it "
    "up again wherever they go, and bake the same loaf they have always baked.",
    "A glacier is a river of ice that moves under its own wieght. Snow that falls faster "
    "than it melts is buried by the next year's snow, and over decades it is pressed into "
    "dense blue ice. When the ice is thick enough, it begins to flow downhill, very "
    "slowly, a few centimetres to a few metres a day. As it moves it plucks rocks from "
    "the ground beneath it and drags them along, scraping the bedrock into smooth slabs "
    "marked with long parallel scratches. These scratches, called striations, tell "
    "geologists wich way the ice was moving thousands of years after it has gone. Where "
    "the glacier ends, the rocks it carried are dropped in long ridges called moraines. "
    "Many of the lakes of northern Europe and North America lie in basins carved by ice "
    "or dammed by moraines at the end of the last ice age. Today most of the world's "
    "glaciers are shrinking. Photographs taken from the same viewpoint a century apart "
    "show valleys that were once filled with ice now bare and grey, with only a small "
    "tongue of ice high up near the ridge. Glaciers store fresh water in the cold season "
    "and release it in the warm one, so the rivers that depend on them may run higher for "
    "a time as the ice melts, and then much lower once it has gone. Scientists measure "
    "thier mass by drilling stakes into the surface and returning each year to see how "
    "much of each stake has been uncovered by melting.",
    "The first public lending libraries in many towns were small rooms above a shop or "
    "a school, open two evenings a week, with a few hundred books on shelves built by "
    "volunteers. Borrowers paid a small subscription and signed their names in a ledger. "
    "The librarian, often a retired teacher, chose the books, mended their spines with "
    "cloth tape and wrote the date of return on a slip pasted inside the cover. Popular "
    "novels were read untill they fell apart; books of sermons stayed on the shelf for "
    "years, their pages uncut. Over time the rooms grew into buildings, and the buildings "
    "into networks, with catalogues that let a reader in one town borrow a book held in "
    "another. The card catalogue, a wooden cabinet of narrow drawers filled with index "
    "cards, was the great invension of this period. Each book had at least three cards: "
    "one under its author, one under its title and one under its subject. Finding a book "
    "meant walking from drawer to drawer, flicking through cards with the tips of your "
    "fingers. Most libraries have replaced the cabinets with computers, and many of the "
    "old cabinets were sold or simply thrown away. A few survive, lovingly restored, in "
    "the entrance halls of libraries that still remember them. Children who have never "
    "seen a card catalogue sometimes open the drawers and ask what they were for, and "
    "the anwser is always the same: they were for finding things, before searching was "
    "something you could do by typing a word into a box.",
)


def repetitive_messages(num: int) -> list[list[dict[str, str]]]:
    """`num` chat conversations, each one user message: an instruction and a passage."""
    conversations = []
    for index in range(num):
        passage = PASSAGES[index % len(PASSAGES)]
        instruction = INSTRUCTIONS[(index // len(PASSAGES)) % len(INSTRUCTIONS)]
        conversations.append([{"role": "user", "content": f"{instruction}\n\n{passage}"}])
    return conversations
