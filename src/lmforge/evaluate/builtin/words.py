"""The word list the synthetic tasks draw from: 1228 common English words, many of them Shakespeare's.

Knows only the words (lowercase, 3 letters or more, letters only, no repeats); the tasks that use
them (letter counting, reversal, sorting) are in ``synthetic``. Everyday words a model trained on
the plays has mostly seen, so a task measures the skill and not the vocabulary.
"""
WORDS: tuple[str, ...] = tuple("""
    able about above accept acorn across act actor add admire advice afraid after again age agree air
    alarm alike alive allow almost alone along aloud amber amend anchor angel anger angry animal ankle
    answer apple april apron arch archer argue arise arm armour army arrow art ash ask asleep attend
    aunt autumn avoid awake away axe baby back bacon badge bag bake ball band bank banner bare bark
    barley barn barrel base basket bath battle bay beach beam bean bear beard beast beat beauty bed bee
    beef beer beg begin bell belly belt bench bend berry beside best better beyond bird birth bishop
    bite bitter black blade blame blank blanket blast bleed bless blind block blood bloom blossom blow
    blue blush board boast boat body boil bold bone book boot border borrow bosom bottle bottom bough
    bound bow bowl box boy brain branch brass brave bread break breast breath breed brew brick bride
    bridge brief bright bring broad brook broom brother brow brown brush bubble bucket bud build bull
    burden burn bush butter button buy cabin cake calf call calm camel camp candle cannon canvas cap
    cape captain card care carpet carry cart carve case castle cat catch cattle cause cave cellar chain
    chair chalk chamber chance change chapel charge charm chase cheap cheek cheer cheese cherry chest
    chief child chimney chin choice choose church circle city claim clap clay clean clear clerk clever
    cliff climb cloak clock close cloth cloud clown club coal coast coat coin cold collar colour comb
    comfort command common copper copy coral cord corn corner cottage cotton cough count country couple
    courage course court cousin cover cow coward crab cradle craft crane crawl cream creek crew crime
    crisp crop cross crow crowd crown cruel crumb crust cry cup cure curse curtain cushion custom dagger
    dairy daisy damage dance danger dare dark darling daughter dawn day deal dear death debt deceive
    deed deep deer defend delay delight depth desert desire desk devil dew diamond dig dinner dirt dish
    ditch dive doctor dog doll dolphin donkey door double doubt dove down dragon draw dream dress drink
    drive drop drown drum duck duke dull dust duty dwarf eagle ear early earn earth east easy eat echo
    edge egg elbow elder empty end enemy engine enjoy enter envy equal error escape evening event exile
    eye face fact fade fail faint fair fairy faith fall false fame family fancy farm fast fat fate
    father fault favour fear feast feather feed feel fellow fence fever field fierce fight figure file
    fill finger fire fish fist flag flame flash flat flesh flight flint float flock flood floor flour
    flower fly foam fog fold follow folly food fool foot forest forget fork form fort fortune fountain
    fox frame free fresh friend frog frost fruit fuel full fun fur gain game garden gate gather gaze
    gentle ghost giant gift girl give glad glass glove glow goat gold goose gown grace grain grand grape
    grass grave gray great greed green greet grief grind groan ground grove grow guard guess guest guide
    guilt gull habit hair half hall hammer hand handle happy harbour hard harm harp harvest haste hat
    hatch hate hawk hay head heal health heap hear heart heat heaven hedge heel height helmet help hen
    herb herd hero hide high hill hint hive hold hole holy home honey honour hood hook hope horn horse
    host hour house hunger hunt hurry hurt husband hut ice idle image inch ink inn iron island ivory ivy
    jacket jail jar jaw jelly jewel join joke journey joy judge jug juice jump justice keen keep kettle
    key kick kid kill kind king kiss kitchen kite knee knife knight knit knock knot know label lace
    ladder lady lake lamb lamp land lane language large lark laugh law lawn lazy lead leaf lean learn
    leather leave ledge lemon lend letter level liar lid life lift light lily limb lime line linen lion
    lip list listen little live lock lodge lofty long look loose lord lose loud love low loyal luck lump
    lung magic maid mail malice man manner map marble march mark market marry mask master match meadow
    meal measure meat melon melt mend mercy merit merry metal middle mild milk mill mind mine mint
    mirror mist moan model monk month moon moral morning moss mother motion mount mouse mouth move mud
    murder muse music nail name narrow nation native nature navy near neck needle nerve nest net never
    news night noble noise noon north nose note number nurse nut oak oar oath obey ocean offer office
    oil old olive onion open orange orchard order organ oven owl owner page pain paint pair palace pale
    palm pan paper parade pardon parent park parrot part pass past paste path patience peace peach pearl
    pebble pen penny people pepper perfect pet piano pick picture pie piece pig pigeon pike pile pill
    pillow pin pine pink pipe pit pity place plain plan plant plate play plead plenty plough plum pocket
    poem poet point poison pole pond pool poor porch port pot potato pound powder power praise pray
    pride priest prince prison prize promise proof proud prune pudding pull pump punish pupil puppy
    purple purse push quarrel queen question quick quiet quill quilt rabbit race rage rain rainbow raise
    rake rat raven raw reach read reason rebel record red reed reign rest reward rhyme ribbon rice rich
    riddle ride ring ripe rise river road roar roast robe robin rock rod roof room root rope rose rough
    round row royal rub rule rumour run rust sack sad saddle safe sail sailor saint salad salt sand
    satin sauce save scale scar scarf school scorn sea seal season seat secret seed seek sense serve
    shade shadow shake shame shape share sharp shave sheep sheet shelf shell shield shine ship shirt
    shoe shore short shoulder shout shovel show shower sick side sigh sight silk silver sing sister sit
    skill skin skirt sky slave sleep sleeve slice slide slip slope slow smell smile smoke snail snake
    snow soap sock soft soil soldier son song sorrow soul sound soup south space spade spark speak spear
    speech speed spell spend spice spider spin spirit spoon sport spot spring square squirrel stable
    staff stage stain stair stamp stand star start state steal steam steel stem step stick still sting
    stitch stock stone stool storm story stove straw stream street strength string strong stuff sugar
    summer sun supper swan sweat sweet swift swim sword table tail tailor tale talk tall tame taste tax
    tea teach tear temple tent term test thank theatre thief thorn thread throat throne thumb thunder
    ticket tide tiger timber time tin tiny toad toast toe tomb tongue tool tooth top torch touch tower
    town toy track trade train tray treasure treat tree trick trip truce trumpet trust truth tulip tune
    turn twig twin uncle union unit valley value vapour veil verse vessel vest view village vine violet
    virtue voice vow voyage wage wagon waist wait walk wall wander war warm warn wash waste watch water
    wave wax weak wealth weapon weather weave wedding weed week weep weight well west wet whale wheat
    wheel whip whisper whistle white wide widow wife wild will willow win wind window wine wing winter
    wire wise wish wit witch wolf woman wonder wood wool word work world worm worth wound wreath wreck
    wrist write yard yarn year yellow yoke young youth zeal zero
""".split())
